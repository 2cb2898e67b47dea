"""Encoder-decoder models (T5, BART, Whisper): an encoder graph and a decoder graph in one folder,
sharing weights and a cross-attention cache on the device. See `modeling_seq2seq.py`."""

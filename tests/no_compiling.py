"""`forbid_compiling(monkeypatch)`: from here on, any compile in this test fails it (a load of a compiled
folder must never recompile)."""

import optimum_npu.modeling.base


def forbid_compiling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a compiled folder was recompiled")

    monkeypatch.setattr(optimum_npu.modeling.base, "compile_from_torch", refuse)

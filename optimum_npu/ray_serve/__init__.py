"""Several vLLM engines on simulated device groups behind one OpenAI endpoint, on Ray Serve.

`app.build_app` makes the application: `engine.NPUEngine` replicas, each a vLLM engine (through
this package's vLLM platform plugin) with vLLM's own OpenAI server inside it, on the `RBLN`
devices Ray assigned to it; `ingress.OpenAIIngress` in front, the one endpoint, which hands each
request to a replica chosen by a request router of `routers` (round-robin, least-loaded or
prefix-aware). `optimum-npu serve FOLDER --replicas N` starts it on a local Ray instance or the
cluster `RAY_ADDRESS` names; `serve run optimum_npu.ray_serve.app:app_builder folder=DIR replicas=N`
does the same through Ray's own CLI.
"""

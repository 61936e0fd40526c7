"""`aotpack serve`: an HTTP image service over one loaded package (FastAPI + uvicorn), scaled out on Ray Serve.

Library first: `registry` (named adapters), `scheduler` (bounded queue, LoRA affinity, batching),
`generate` (one batch through the pipeline), `worker` (the single model thread + adapter prefetch),
`metrics` (Prometheus), `service` (ties them together); then the thin shells `app` (FastAPI),
`server` (uvicorn) and `ray_app` (Ray Serve).
"""

"""Serving a checkpoint over HTTP (``tools/serve.py``, ``internevo-serve``): ``engine`` (continuous batching on the
KV cache), ``protocol`` (OpenAI request bodies and errors), ``chat`` (messages -> prompt), ``text`` (streaming
detokenization, stop strings, the byte tokenizer), ``app`` (the routes and the page in ``static/``). Needs the
``serve`` extra (fastapi, uvicorn); nothing else in the package imports this one."""

"""The command-line tools, each run as a script (``python tools/<name>.py``); installed, they are the package
``internevo_jax.tools`` (``python -m internevo_jax.tools.<name>``). This file makes that package regular, which an
editable install (``pip install -e .``) needs to map it to this folder."""

"""Weights in other layouts and formats: ``detect`` (which format a folder holds), ``ours`` (our step folders read
outside a run), ``hf_config`` / ``hf_layout`` (Hugging Face configs and tensor layouts, the HF export), ``hf_folder``
(reading HF folders), ``safetensors_io`` (streamed safetensors files), ``torch_ckpt`` / ``torch_shards`` (InternEvo
``.pt`` and Meta ``.pth`` files) and ``hf_tokenizer`` (the training tokenizer as an HF one)."""

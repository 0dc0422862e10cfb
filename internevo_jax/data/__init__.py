"""Data: InternEvo datasets (dummy now; tokenized .bin/.meta and HF next), packing, and the resumable loader."""

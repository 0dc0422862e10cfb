"""Data: InternEvo datasets (dummy and tokenized .bin/.meta; HF next), packing, and the resumable loader."""

"""Root of the test suite: its folder is on sys.path (pytest's default import mode), so every
test imports the shared tiny models from `tiny_hf` (Llama) and the engine's tiny safetensors
folders from `engine/tiny_models.py`."""

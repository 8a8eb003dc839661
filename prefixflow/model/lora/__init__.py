"""LoRA adapters, the torch side: reading PEFT folders (peft_folder.py), fitting their
tensors to the decoder's fused layers (targets.py), and adding every adapter's low-rank
term to its own rows of a step in one forward pass (apply.py)."""

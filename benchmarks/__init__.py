"""The benchmark rig: klotski's ablation ladder beside Hugging Face Accelerate under one RAM cap."""

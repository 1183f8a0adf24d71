"""The pipeline: `VQDiffusion` wires the loaded networks to the samplers for every task (generate, inpaint, vary)."""

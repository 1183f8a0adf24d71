"""The networks of VQ-Diffusion: VQ-VAE, diffusion transformer and text conditioning; no files, no Hub, no sampling."""

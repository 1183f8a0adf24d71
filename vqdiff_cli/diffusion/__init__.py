"""The diffusion math as pure functions: the mask-and-replace schedule, its posteriors, and the reference and fast
samplers that run the reverse process."""

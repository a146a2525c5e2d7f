"""The latent cache of precompute_latents.py and the images it is built from."""

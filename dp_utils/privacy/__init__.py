"""The privacy machinery around the engine: make_private, the DP optimizer, noise, Poisson sampling, secrets, audit."""

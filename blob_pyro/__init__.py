"""blob_pyro: Bayesian low-rank adaptation (BLoB) of language models in Pyro."""

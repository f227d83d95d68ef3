"""jaxsae: sparse autoencoders as pure JAX functions, trained as vmapped seed ensembles."""

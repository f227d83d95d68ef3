"""lime_jax: a Llama-style decoder with Layer-Integrated Memory routing, in pure JAX."""

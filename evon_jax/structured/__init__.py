"""The seed papers' other structured posteriors, for comparison and for models trained
without EVON: post-hoc SOAP-Bubble Laplace, low-rank layers, mean-field VI and VIKING."""

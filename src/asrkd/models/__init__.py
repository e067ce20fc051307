"""Model parts (frontend, encoder, decoders, CTC head) and the E2EASR / KDWrapper assemblies."""

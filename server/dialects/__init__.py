"""Wire formats. Each adapter parses its dialect into canonical requests and formats canonical
results back; none of them touches tensors or knows how batching works."""

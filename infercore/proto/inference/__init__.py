"""Generated gRPC stubs of proto/inference; regenerate with `make proto`, never edit."""

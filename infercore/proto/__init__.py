"""Generated gRPC stubs of proto/infercore/v1; regenerate with `make proto`, never edit."""

"""Generated from protos/soda/proto/v1 by scripts/gen-protos; never edit by hand."""

"""The wire API: versioned .proto files and the Python code generated from them (regenerate: scripts/gen_protos.sh)."""

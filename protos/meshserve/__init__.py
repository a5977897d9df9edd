"""The meshserve protobuf package; each subpackage is one API version."""

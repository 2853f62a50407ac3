"""Code generated from proto/loraloop/v1 by `loraloop proto gen`; do not edit."""

"""Generated from protos/shepherd/v1 by tools/gen_protos.py; do not edit."""

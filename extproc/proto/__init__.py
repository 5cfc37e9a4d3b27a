"""Generated code for the control API (``protos/tollgate/admin/v1/admin.proto``).

Do not edit: ``make protos`` (``python -m extproc.protogen``) regenerates these files, and
tests/test_control_api.py fails if they do not match the proto.
"""

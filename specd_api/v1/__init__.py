"""Generated gRPC/protobuf stubs of proto/specd/v1/specd.proto (``python -m deploy.gen_proto``); do not edit."""

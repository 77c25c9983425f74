"""The AWS deployment: the image (Dockerfile), the Lambda handlers (lambdas/), the S3 event
shapes they parse (s3_events.py), the state machine (state_machine.asl.json) and the
CloudFormation template embedding it (template.yaml; definition.py keeps the copy in step).
README: "Deploy on AWS"."""

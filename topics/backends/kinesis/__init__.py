"""Kinesis Data Streams backend (boto3 + aws-kinesis-agg), on the KCL's lease table."""

"""Lambda handlers of the deployment, one module each; the image's CMD names one of them
(`deploy.lambdas.submit.handler`, ...). Each parses its event, then calls the project's
runtime (streams.pipeline, the importer, the processors): no pipeline logic lives here.

    submit.handler       S3 object created (EventBridge or S3 notification) -> guard, record
    import_file.handler  import one (small) object as a batch
    kinesis.handler      a processor over a Kinesis event source mapping's batches
    status_step.handler  a state machine step's start, end or error into the batch status
    scheduled.handler    EventBridge Scheduler jobs: a re-import or a replay
"""

"""The smallest coldbrew function: echo the event back with a greeting."""

import coldbrew

app = coldbrew.App("hello")


@app.function(memory_mb=128, timeout_s=5, keep_alive_s=60)
def hello(event, context):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"greeting {name} from request {context.aws_request_id}")
    return {"message": f"Hello, {name}!", "cold_start": context.cold_start}

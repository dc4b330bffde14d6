"""The gateway's HTTP front: OpenAI's and Anthropic's APIs (and BlockPress's agent tasks) over the same
admission, queue, API keys and tracing as gRPC. `Gateway` starts it when `RuntimeSettings.http_port` is
set; `protocol.py` holds the bodies, `chat.py`, `anthropic.py` and `agent.py` translate them, `app.py`
routes them and `server.py` serves them with uvicorn in the gateway's event loop.
"""

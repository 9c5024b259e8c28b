"""`mtserve bench`: engine, service overhead, cross-task batching, memory, a real peer, idle latency.

No torch here: the scenarios drive onnxruntime (service.engine) and real server processes.
"""

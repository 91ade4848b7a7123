"""
The test rig: real parts for tests, benchmarks and the development runner
(a private dockerd, test images, a local registry, the agent as a twistd
subprocess).  Not shipped in the wheel.
"""

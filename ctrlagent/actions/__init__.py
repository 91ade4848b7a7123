"""
The actions of the protocol, behind both transports: ``registry`` holds the
one dispatcher of every action (PROTOCOL.md section 2).
"""

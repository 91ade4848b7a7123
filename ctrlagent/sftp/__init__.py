"""
The agent's SFTP server: one login reaches one game server's data directory.

``service.make_sftp_service`` builds it (an SSH server on a Twisted endpoint,
``twisted.conch``); ``config`` holds its settings; ``credentials`` the local
logins; ``protocol`` the SFTP v3 wire (hardened: bounded packets, bounded
requests in flight, no tracebacks for any input); ``filesystem`` every file
operation through ``ctrlagent.files.confined.Confined``.  docs/SFTP.md tells
the whole story.
"""

"""
Backups of game servers' data directories: archives made and restored
confined, stored by a driver (local disk, S3, restic), kept by a schedule.

``config`` reads the ``[backups]`` settings; ``archive`` writes and reads the
streaming tar+zstd archives (thread-side); ``restore`` puts an archive back
through a staging directory swapped in at once; ``local`` is the local-disk
driver; ``store`` the SQLite table of backups; ``manager`` the
``BackupManager`` the actions call.
"""

"""The public face of the package: the :class:`Cluster` facade and the session
(``init()``, the serve-or-drive decision)."""

"""The Debian archive as apt sees it: package indexes, pin priorities, relations, .deb downloads."""

"""The devmapd Textual dashboard."""

"""The demo (`lavcap demo`) and the web demo (`lavcap app`)."""

"""Model cards and Hub uploads (`lavcap push-to-hub`)."""

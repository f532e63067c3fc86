"""Captioning many files: `lavcap caption`, the resumable sharded run it shares with `lavcap evaluate`,
the decode path shared with the Trainer's evaluation, and pictures of OT plans."""

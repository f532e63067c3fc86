"""Stand-ins, written for this project, for the modules that transformers' sdist test files import but the sdist
does not contain. Each is registered under the name the sdist imports (see `transformers_common.SHIMS`)."""

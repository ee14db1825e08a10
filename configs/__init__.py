"""The shipped YAML configs, package data found by name: ``fmrl train --config digits_ac_flow``
(``services.config.resolve_config``). No code: this file only makes the folder a package, so
the configs install with the project and resolve the same from a checkout, an editable
install, a wheel or a Ray job's working directory."""

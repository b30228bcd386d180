"""Pure text functions: splitting reasoning from answers, answer extraction and verification,
judge-verdict parsing, prompt templates, content ids, decontamination."""

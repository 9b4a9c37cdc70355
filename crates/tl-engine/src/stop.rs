//! Stop strings over streamed text. Text that could still turn out to be the
//! start of a stop string is held back, so a stop string never reaches the
//! client. (Same rule as `tl_model::llm`'s filter, which borrows its stop
//! list; a live sequence must own its own.)

#[derive(Debug, Default)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds decoded text; returns the text safe to emit and whether a stop
    /// string was hit (then the text is cut just before it).
    pub(crate) fn push(&mut self, s: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (s.to_string(), false);
        }
        self.held.push_str(s);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|st| self.held.find(st.as_str()))
            .min()
        {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return (emit, true);
        }
        // Keep the longest suffix of `held` that is a proper prefix of a stop.
        let mut keep = 0;
        for st in &self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() <= keep {
                    break;
                }
                if st.starts_with(suffix) {
                    keep = suffix.len();
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let emit: String = self.held.drain(..cut).collect();
        (emit, false)
    }

    /// What is still held back, once generation ended for another reason.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut f = StopFilter::new(vec!["STOP".into(), "\n\n".into(), String::new()]);
        assert_eq!(f.push("hello S"), ("hello ".to_string(), false));
        assert_eq!(f.push("T"), (String::new(), false));
        assert_eq!(f.push("x"), ("STx".to_string(), false));
        assert_eq!(f.push(" a\n"), (" a".to_string(), false));
        assert_eq!(f.push("\nrest"), (String::new(), true));
    }

    #[test]
    fn no_stops_passes_through_and_tail_is_flushed() {
        let mut f = StopFilter::new(vec![]);
        assert_eq!(f.push("abc"), ("abc".to_string(), false));
        let mut f = StopFilter::new(vec!["xyz".into()]);
        assert_eq!(f.push("abx"), ("ab".to_string(), false));
        assert_eq!(f.finish(), "x");
    }
}

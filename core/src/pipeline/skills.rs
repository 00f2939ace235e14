//! The skilled miniature's chat data: deterministic ShareGPT records of
//! skills whose answers can be checked exactly, and of short general
//! dialogue. Each record names its skill in `category`.
//!
//! - `add`: "what is 3 plus 4 ?" → "7" (one-digit numbers: recall of 100
//!   sums, as a tiny model learns them);
//! - `reverse`: "reverse : kemi bada lotu" → "lotu kemi bada" (three words of
//!   a pool of 40, so held-out sequences are almost all new: the skill has to
//!   generalise);
//! - `capital`: "what is the capital of Zorava ?" → "Melk" (recall of a table
//!   of 24 invented countries);
//! - `dialogue`: a made-up sentence, answered by a stock reply about its
//!   last word ("tell me more about kemi ."), picked by the sentence's first
//!   word; learnable, but with no checked answer (perplexity only).
//!
//! A skill record is preceded by a dialogue exchange one time in four, so
//! the same question comes in different contexts.

use crate::rng::SplitMix64;
use std::collections::BTreeMap;

/// The skills with checkable answers, in report order.
pub const SKILLS: [&str; 3] = ["add", "reverse", "capital"];
/// The category of general dialogue.
pub const DIALOGUE: &str = "dialogue";

/// The invented world the records are drawn from; the same for every seed.
pub struct World {
    /// Dialogue words.
    chat: Vec<String>,
    /// Words that `reverse` records reverse.
    pool: Vec<String>,
    /// (country, capital).
    countries: Vec<(String, String)>,
}

fn syllable_words() -> Vec<String> {
    let (cons, vows) = ("bdfgklmnprstvz", "aeiou");
    let mut v = Vec::new();
    for c1 in cons.chars() {
        for v1 in vows.chars() {
            for c2 in cons.chars() {
                for v2 in vows.chars() {
                    v.push(format!("{c1}{v1}{c2}{v2}"));
                }
            }
        }
    }
    v
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    pub fn new() -> World {
        // A fixed shuffle of the syllable words, cut into disjoint pools.
        let mut words = syllable_words();
        let mut rng = SplitMix64(0x5EED_0F5C_1115);
        for i in (1..words.len()).rev() {
            words.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let chat = words[..160].to_vec();
        let pool = words[160..200].to_vec();
        let countries = (0..24)
            .map(|i| {
                let a = &words[200 + 2 * i];
                let b = &words[201 + 2 * i];
                let c = &words[260 + i];
                (capitalised(&format!("{a}{}", &b[..2])), capitalised(c))
            })
            .collect();
        World {
            chat,
            pool,
            countries,
        }
    }

    fn pick<'a>(rng: &mut SplitMix64, v: &'a [String]) -> &'a str {
        &v[(rng.next_u64() % v.len() as u64) as usize]
    }

    fn sentence(&self, rng: &mut SplitMix64) -> String {
        let n = 3 + (rng.next_u64() % 5) as usize;
        let mut s: Vec<&str> = (0..n).map(|_| Self::pick(rng, &self.chat)).collect();
        s.push(if rng.next_u64() % 3 == 0 { "?" } else { "." });
        s.join(" ")
    }

    /// A question of `skill` and its answer.
    fn exchange(&self, skill: &str, rng: &mut SplitMix64) -> (String, String) {
        let form = rng.next_u64() % 2 == 0;
        match skill {
            "add" => {
                let (a, b) = (rng.next_u64() % 10, rng.next_u64() % 10);
                let q = if form {
                    format!("what is {a} plus {b} ?")
                } else {
                    format!("add {a} and {b} .")
                };
                (q, (a + b).to_string())
            }
            "reverse" => {
                let w: Vec<&str> = (0..3).map(|_| Self::pick(rng, &self.pool)).collect();
                let q = if form {
                    format!("reverse : {}", w.join(" "))
                } else {
                    format!("say backwards : {}", w.join(" "))
                };
                let mut r = w.clone();
                r.reverse();
                (q, r.join(" "))
            }
            "capital" => {
                let (c, cap) =
                    &self.countries[(rng.next_u64() % self.countries.len() as u64) as usize];
                let q = if form {
                    format!("what is the capital of {c} ?")
                } else {
                    format!("name the capital of {c} .")
                };
                (q, cap.clone())
            }
            _ => {
                let q = self.sentence(rng);
                let a = Self::reply(&q);
                (q, a)
            }
        }
    }

    /// The stock reply to a dialogue sentence: about its last word, in one of
    /// four forms chosen by its first word and whether it asks.
    fn reply(q: &str) -> String {
        let words: Vec<&str> = q.split(' ').collect();
        let last = words[words.len().saturating_sub(2)];
        let form = words[0].bytes().map(u64::from).sum::<u64>() % 2;
        match (q.ends_with('?'), form) {
            (true, 0) => format!("i do not know about {last} ."),
            (true, _) => format!("why {last} ?"),
            (false, 0) => format!("tell me more about {last} ."),
            (false, _) => format!("i like {last} too ."),
        }
    }

    /// One record of `skill` (a skill of [`SKILLS`] or [`DIALOGUE`]).
    pub fn record(&self, id: &str, skill: &str, rng: &mut SplitMix64) -> serde_json::Value {
        let mut turns = Vec::new();
        let lead = skill != DIALOGUE && rng.next_u64() % 4 == 0;
        if lead || skill == DIALOGUE {
            let (q, a) = self.exchange(DIALOGUE, rng);
            turns.push((q, a));
        }
        if skill != DIALOGUE {
            turns.push(self.exchange(skill, rng));
        }
        let conv: Vec<serde_json::Value> = turns
            .into_iter()
            .flat_map(|(q, a)| {
                [
                    serde_json::json!({"from": "human", "value": q}),
                    serde_json::json!({"from": "gpt", "value": a}),
                ]
            })
            .collect();
        serde_json::json!({"id": id, "category": skill, "conversations": conv})
    }

    /// `n` records drawn from `mix` (category → share; shares need not sum
    /// to 1), ids `<prefix>_<i>`, in a seeded order.
    pub fn records(
        &self,
        n: usize,
        mix: &BTreeMap<String, f64>,
        seed: u64,
        prefix: &str,
    ) -> Vec<serde_json::Value> {
        let total: f64 = mix.values().sum();
        // Exact counts per category (largest remainder), then a seeded shuffle.
        let mut counts: Vec<(&String, usize, f64)> = mix
            .iter()
            .map(|(k, w)| {
                let x = n as f64 * w / total;
                (k, x.floor() as usize, x - x.floor())
            })
            .collect();
        let short = n - counts.iter().map(|c| c.1).sum::<usize>();
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|&a, &b| counts[b].2.total_cmp(&counts[a].2).then(a.cmp(&b)));
        for &i in order.iter().take(short) {
            counts[i].1 += 1;
        }
        let mut skills: Vec<&str> = counts
            .iter()
            .flat_map(|(k, c, _)| std::iter::repeat_n(k.as_str(), *c))
            .collect();
        let mut rng = SplitMix64(seed ^ 0xD1A1_0675);
        for i in (1..skills.len()).rev() {
            skills.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        skills
            .iter()
            .enumerate()
            .map(|(i, s)| self.record(&format!("{prefix}_{i}"), s, &mut rng))
            .collect()
    }

    /// Every word the records can contain (for a word-level vocabulary), sorted.
    pub fn words(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .chat
            .iter()
            .chain(&self.pool)
            .cloned()
            .chain(
                self.countries
                    .iter()
                    .flat_map(|(a, b)| [a.clone(), b.clone()]),
            )
            .chain((0..19).map(|i| i.to_string()))
            .chain(
                [
                    "what",
                    "is",
                    "plus",
                    "add",
                    "and",
                    "reverse",
                    "say",
                    "backwards",
                    "the",
                    "capital",
                    "of",
                    "name",
                    ":",
                    ".",
                    "?",
                    "i",
                    "do",
                    "not",
                    "know",
                    "about",
                    "why",
                    "tell",
                    "me",
                    "more",
                    "like",
                    "too",
                    // The openchat template's words: without them both
                    // roles would read `<unk> <unk> <unk> :`.
                    "GPT4",
                    "Correct",
                    "User",
                    "Assistant",
                ]
                .map(String::from),
            )
            .collect();
        w.sort();
        w.dedup();
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_right_and_counts_exact() {
        let w = World::new();
        let mix: BTreeMap<String, f64> = [
            ("add", 1.0),
            ("reverse", 1.0),
            ("capital", 2.0),
            ("dialogue", 1.0),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into();
        let recs = w.records(50, &mix, 7, "t");
        assert_eq!(recs.len(), 50);
        let count = |c: &str| recs.iter().filter(|r| r["category"] == c).count();
        assert_eq!(
            [
                count("add"),
                count("reverse"),
                count("capital"),
                count("dialogue")
            ],
            [10, 10, 20, 10]
        );
        let vocab = w.words();
        // the openchat template's words are in the vocabulary: the roles differ
        for t in ["GPT4", "Correct", "User", "Assistant"] {
            assert!(vocab.binary_search(&t.to_string()).is_ok(), "{t}");
        }
        for r in &recs {
            let turns = r["conversations"].as_array().unwrap();
            let q = turns[turns.len() - 2]["value"].as_str().unwrap();
            let a = turns[turns.len() - 1]["value"].as_str().unwrap();
            for t in turns {
                for word in t["value"].as_str().unwrap().split(' ') {
                    assert!(vocab.binary_search(&word.to_string()).is_ok(), "{word}");
                }
            }
            match r["category"].as_str().unwrap() {
                "add" => {
                    let n: Vec<u64> = q.split(' ').filter_map(|x| x.parse().ok()).collect();
                    assert_eq!(a, (n[0] + n[1]).to_string(), "{q}");
                }
                "reverse" => {
                    let words: Vec<&str> = q.rsplit(' ').take(3).collect();
                    assert_eq!(a, words.join(" "), "{q}");
                }
                "dialogue" => {
                    // a stock reply about the sentence's last word
                    let last = q.split(' ').rev().nth(1).unwrap();
                    assert!(a.split(' ').any(|x| x == last), "{q} -> {a}");
                    assert!(a.ends_with(" .") || a.ends_with(" ?"), "{a}");
                }
                _ => {
                    let c = q.split(' ').rev().nth(1).unwrap();
                    let cap = &w.countries.iter().find(|x| x.0 == c).unwrap().1;
                    assert_eq!(a, cap);
                }
            }
        }
        // same seed, same records
        assert_eq!(recs, w.records(50, &mix, 7, "t"));
    }
}

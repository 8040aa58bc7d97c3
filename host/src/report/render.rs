//! The comparison as text: Markdown, CSV and LaTeX, from the same numbers. Means and
//! standard deviations are rounded once, when the comparison is made (`round2`); every format
//! prints those rounded values, so the three agree digit for digit.

use super::Comparison;

/// `x` rounded to two decimals; a value that rounds to zero is +0 (no `-0.00`).
pub fn round2(x: f64) -> f64 {
    let r = (x * 100.0).round() / 100.0;
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// Two decimals (a count of parameters: none).
fn number(x: f64, integer: bool) -> String {
    if integer {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

impl Comparison {
    fn is_integer(&self, j: usize) -> bool {
        self.headers[j] == "trainable params"
    }

    /// (mean, std when there are several seeds, delta to the baseline) of cell (row i,
    /// column j), as text.
    fn parts(&self, i: usize, j: usize) -> Option<(String, Option<String>, Option<String>)> {
        let (mean, std) = self.rows[i].2[j]?;
        let integer = self.is_integer(j);
        let std = (self.rows[i].1 > 1 && !integer).then(|| number(std, false));
        let delta = self
            .baseline
            .filter(|&b| b != i && !integer)
            .and_then(|b| self.rows[b].2[j])
            .map(|(base, _)| format!("{:+.2}", round2(mean - base)))
            .map(|d| if d == "-0.00" { "+0.00".to_string() } else { d });
        Some((number(mean, integer), std, delta))
    }

    /// The text of cell (row i, column j): mean (± std over seeds), delta to the baseline.
    pub fn cell(&self, i: usize, j: usize) -> String {
        let Some((mean, std, delta)) = self.parts(i, j) else { return "-".into() };
        let mut s = mean;
        if let Some(std) = std {
            s.push_str(&format!(" ± {std}"));
        }
        if let Some(d) = delta {
            s.push_str(&format!(" ({d})"));
        }
        s
    }

    fn caption(&self) -> String {
        format!(
            "mean ± std over seeds; R@1 in %, BWT and forgetting averaged over both directions, PD = zero-shot top-1 \
             before minus after (lower is better); batch size {}.",
            self.batch_sizes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
        )
    }

    /// Markdown: best per column in bold; the baseline's row marked; notes and missing runs
    /// below.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "| method | seeds | {} |\n|---|---:|{}\n",
            self.headers.join(" | "),
            "---:|".repeat(self.headers.len())
        );
        for (i, (m, n, _)) in self.rows.iter().enumerate() {
            let name = if self.baseline == Some(i) { format!("{m} (baseline)") } else { m.clone() };
            out.push_str(&format!("| {name} | {n} |"));
            for j in 0..self.headers.len() {
                let c = self.cell(i, j);
                if self.best[j] == Some(i) && self.rows.len() > 1 {
                    out.push_str(&format!(" **{c}** |"));
                } else {
                    out.push_str(&format!(" {c} |"));
                }
            }
            out.push('\n');
        }
        out.push_str(&format!("\n{}\n", self.caption()));
        if !self.notes.is_empty() {
            out.push_str(&format!(
                "\nnote: these rows may not be comparable:\n{}",
                self.notes.iter().map(|m| format!("- {m}\n")).collect::<String>()
            ));
        }
        if !self.missing.is_empty() {
            out.push_str(&format!(
                "\nmissing runs:\n{}\n",
                self.missing.iter().map(|m| format!("- {m}\n")).collect::<String>()
            ));
        }
        out
    }

    /// CSV: one row per method, mean and std columns per metric, the rounded values.
    pub fn csv(&self) -> String {
        let mut out = String::from("method,seeds");
        for h in &self.headers {
            out.push_str(&format!(",{h} mean,{h} std"));
        }
        out.push('\n');
        for (m, n, cells) in &self.rows {
            out.push_str(&format!("\"{}\",{n}", m.replace('"', "\"\"")));
            for (j, c) in cells.iter().enumerate() {
                match c {
                    Some((mean, std)) => {
                        let integer = self.is_integer(j);
                        out.push_str(&format!(",{},{}", number(*mean, integer), number(*std, integer)));
                    }
                    None => out.push_str(",,"),
                }
            }
            out.push('\n');
        }
        out
    }

    /// A LaTeX `table` with booktabs rules (`\\usepackage{booktabs}`): best per column in
    /// bold, std as `\\pm`, deltas to the baseline in parentheses.
    pub fn latex(&self) -> String {
        let mut out = String::from("% recall compare; needs \\usepackage{booktabs}\n\\begin{table}[t]\n\\centering\n");
        out.push_str("\\resizebox{\\linewidth}{!}{%\n");
        out.push_str(&format!("\\begin{{tabular}}{{lr{}}}\n\\toprule\n", "r".repeat(self.headers.len())));
        let headers: Vec<String> = self.headers.iter().map(|h| tex_escape(h)).collect();
        out.push_str(&format!("Method & Seeds & {} \\\\\n\\midrule\n", headers.join(" & ")));
        for (i, (m, n, _)) in self.rows.iter().enumerate() {
            let mut name = tex_escape(m);
            if self.baseline == Some(i) {
                name.push_str(" (baseline)");
            }
            let cells: Vec<String> = (0..self.headers.len())
                .map(|j| match self.parts(i, j) {
                    None => "--".into(),
                    Some((mean, std, delta)) => {
                        let mut value = mean;
                        if let Some(std) = std {
                            value = format!("{value} \\pm {std}");
                        }
                        let value = if self.best[j] == Some(i) && self.rows.len() > 1 {
                            format!("$\\mathbf{{{value}}}$")
                        } else {
                            format!("${value}$")
                        };
                        match delta {
                            Some(d) => format!("{value} \\scriptsize{{({d})}}"),
                            None => value,
                        }
                    }
                })
                .collect();
            out.push_str(&format!("{name} & {n} & {} \\\\\n", cells.join(" & ")));
        }
        out.push_str("\\bottomrule\n\\end{tabular}}\n");
        out.push_str(&format!("\\caption{{{}}}\n\\end{{table}}\n", tex_escape(&self.caption()).replace('±', "$\\pm$")));
        out
    }
}

/// Text for LaTeX: its special characters escaped.
fn tex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '~' => out.push_str("\\textasciitilde{}"),
            '^' => out.push_str("\\textasciicircum{}"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comparison() -> Comparison {
        Comparison {
            headers: vec!["Avg I2T R@1".into(), "trainable params".into()],
            rows: vec![
                ("fine_tune".into(), 2, vec![Some((round2(27.034999), round2(0.631))), Some((886017.0, 0.0))]),
                ("c-clip & more".into(), 1, vec![Some((round2(27.0349), 0.0)), Some((942465.0, 0.0))]),
            ],
            best: vec![Some(0), Some(0)],
            baseline: Some(0),
            missing: Vec::new(),
            batch_sizes: vec![64],
            curves: Vec::new(),
            notes: vec!["train.epochs differs: fine_tune 3, c-clip & more 10".into()],
        }
    }

    #[test]
    fn numbers_are_rounded_once_and_never_negative_zero() {
        assert_eq!(round2(-0.001), 0.0);
        assert!(round2(-0.001).is_sign_positive());
        assert_eq!(round2(0.1 + 0.2), 0.3);
        let c = comparison();
        // 27.03 - 27.03 is +0.00, not -0.00 nor float noise.
        assert_eq!(c.cell(1, 0), "27.03 (+0.00)");
        assert_eq!(c.cell(0, 0), "27.03 ± 0.63");
        assert!(c.csv().contains(",27.03,0.63,886017,0\n"), "{}", c.csv());
        assert!(!c.csv().contains("0000000"), "{}", c.csv());
    }

    #[test]
    fn latex_escapes_names_bolds_the_best_and_keeps_the_same_digits() {
        let t = comparison().latex();
        assert!(t.contains("\\begin{tabular}{lrrr}") && t.contains("\\toprule") && t.contains("\\bottomrule"), "{t}");
        assert!(
            t.contains("fine\\_tune (baseline) & 2 & $\\mathbf{27.03 \\pm 0.63}$ & $\\mathbf{886017}$ \\\\"),
            "{t}"
        );
        assert!(t.contains("c-clip \\& more & 1 & $27.03$ \\scriptsize{(+0.00)} & $942465$ \\\\"), "{t}");
        let md = comparison().markdown();
        assert!(md.contains("note: these rows may not be comparable") && md.contains("train.epochs differs"), "{md}");
    }
}

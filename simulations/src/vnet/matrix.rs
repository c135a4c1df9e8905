//! RTT matrices: parsing, synthesis, and the true best paths.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A symmetric matrix of round-trip times between named regions, in ms.
#[derive(Clone, Debug, PartialEq)]
pub struct RttMatrix {
    /// Region names, in matrix order.
    names: Vec<String>,
    /// Row-major RTTs in ms; the diagonal is 0.
    rtt_ms: Vec<f64>,
}

/// Why a matrix file was rejected. Line numbers count from 1.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// No header line.
    #[error("the matrix is empty: expected a header line `region,<name>,<name>,...`")]
    Empty,
    /// Fewer than two regions.
    #[error("the header names {0} region(s); a matrix needs at least 2")]
    TooFewRegions(usize),
    /// More regions than the simulator indexes.
    #[error("the header names {0} regions; at most 65535 are supported")]
    TooManyRegions(usize),
    /// A region name is empty.
    #[error("line {line}: empty region name in column {column}")]
    EmptyName {
        /// Line.
        line: usize,
        /// Column (1-based).
        column: usize,
    },
    /// A region is named twice in the header.
    #[error("region `{0}` appears twice in the header")]
    DuplicateName(String),
    /// A row has the wrong number of cells.
    #[error("line {line}: expected {expected} cells, found {found}")]
    ColumnCount {
        /// Line.
        line: usize,
        /// Cells expected (1 + number of regions).
        expected: usize,
        /// Cells found.
        found: usize,
    },
    /// The number of rows differs from the number of regions.
    #[error("expected {expected} data rows (one per region in the header), found {found}")]
    RowCount {
        /// Rows expected.
        expected: usize,
        /// Rows found.
        found: usize,
    },
    /// A row's name is not the region of the same position in the header.
    #[error("line {line}: row is named `{found}` but the header says row {row} is `{expected}`")]
    RowName {
        /// Line.
        line: usize,
        /// Row index (1-based).
        row: usize,
        /// Name expected.
        expected: String,
        /// Name found.
        found: String,
    },
    /// A cell is not a number.
    #[error("line {line}, column `{column}`: `{text}` is not a number of milliseconds")]
    BadNumber {
        /// Line.
        line: usize,
        /// Column region name.
        column: String,
        /// The cell.
        text: String,
    },
    /// A cell is negative, infinite or NaN, or an off-diagonal cell is 0.
    #[error(
        "line {line}, column `{column}`: {value} ms is not a valid RTT (must be finite and > 0 off the diagonal)"
    )]
    BadValue {
        /// Line.
        line: usize,
        /// Column region name.
        column: String,
        /// The value.
        value: f64,
    },
    /// A diagonal cell is not 0.
    #[error("line {line}: the RTT from `{region}` to itself must be 0, found {value}")]
    Diagonal {
        /// Line.
        line: usize,
        /// The region.
        region: String,
        /// The value.
        value: f64,
    },
    /// `rtt(a, b) != rtt(b, a)`.
    #[error("the matrix is not symmetric: {a}→{b} is {ab} ms but {b}→{a} is {ba} ms")]
    Asymmetric {
        /// Row region.
        a: String,
        /// Column region.
        b: String,
        /// rtt(a, b).
        ab: f64,
        /// rtt(b, a).
        ba: f64,
    },
}

/// Tolerance for symmetry, in ms: the published matrix has two decimals.
const SYMMETRY_TOLERANCE_MS: f64 = 0.01;

/// The measured 30-city matrix (WonderProxy, July 2020; `simulations/data/README.md`),
/// carried inside the binary so the simulator needs no file beside it.
const BUILTIN_CSV: &str = include_str!("../../data/rtt_matrix.csv");

/// How reports name the built-in matrix.
pub const BUILTIN_NAME: &str = "simulations/data/rtt_matrix.csv (built in)";

impl RttMatrix {
    /// The measured 30-city matrix the simulator uses when no other is named.
    pub fn builtin() -> Self {
        // The file is checked by a unit test below, so this cannot fail in a built binary.
        match RttMatrix::parse(BUILTIN_CSV) {
            Ok(m) => m,
            Err(e) => unreachable!("the built-in matrix is invalid: {e}"),
        }
    }

    /// The matrix at `path`, or the built-in one when `path` is `None`.
    pub fn from_file_or_builtin(path: Option<&Path>) -> Result<Self, MatrixError> {
        match path {
            Some(p) => RttMatrix::from_file(p),
            None => Ok(RttMatrix::builtin()),
        }
    }

    /// Reads and validates a matrix file.
    pub fn from_file(path: &Path) -> Result<Self, MatrixError> {
        let text = std::fs::read_to_string(path).map_err(|source| MatrixError::Io {
            path: path.display().to_string(),
            source,
        })?;
        RttMatrix::parse(&text)
    }

    /// Parses CSV text: a header `region,<name>,...`, then one row per region in header
    /// order, `name,<rtt ms>,...`; symmetric, zero diagonal. Blank lines are ignored.
    pub fn parse(text: &str) -> Result<Self, MatrixError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let (header_line, header) = lines.next().ok_or(MatrixError::Empty)?;
        let names: Vec<String> = header
            .split(',')
            .skip(1)
            .map(|c| c.trim().to_owned())
            .collect();
        if names.len() < 2 {
            return Err(MatrixError::TooFewRegions(names.len()));
        }
        if names.len() > usize::from(u16::MAX) {
            return Err(MatrixError::TooManyRegions(names.len()));
        }
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(MatrixError::EmptyName {
                    line: header_line,
                    column: i + 2,
                });
            }
            if names[..i].contains(name) {
                return Err(MatrixError::DuplicateName(name.clone()));
            }
        }
        let n = names.len();
        let mut rtt_ms = Vec::with_capacity(n * n);
        let mut rows = 0;
        let mut row_lines = Vec::with_capacity(n);
        for (line, row) in lines {
            let cells: Vec<&str> = row.split(',').map(str::trim).collect();
            if cells.len() != n + 1 {
                return Err(MatrixError::ColumnCount {
                    line,
                    expected: n + 1,
                    found: cells.len(),
                });
            }
            if rows >= n {
                return Err(MatrixError::RowCount {
                    expected: n,
                    found: rows + 1,
                });
            }
            if cells[0] != names[rows] {
                return Err(MatrixError::RowName {
                    line,
                    row: rows + 1,
                    expected: names[rows].clone(),
                    found: cells[0].to_owned(),
                });
            }
            for (j, cell) in cells[1..].iter().enumerate() {
                let value: f64 = cell.parse().map_err(|_| MatrixError::BadNumber {
                    line,
                    column: names[j].clone(),
                    text: (*cell).to_owned(),
                })?;
                if j == rows {
                    if value != 0.0 {
                        return Err(MatrixError::Diagonal {
                            line,
                            region: names[j].clone(),
                            value,
                        });
                    }
                } else if !value.is_finite() || value <= 0.0 {
                    return Err(MatrixError::BadValue {
                        line,
                        column: names[j].clone(),
                        value,
                    });
                }
                rtt_ms.push(value);
            }
            row_lines.push(line);
            rows += 1;
        }
        if rows != n {
            return Err(MatrixError::RowCount {
                expected: n,
                found: rows,
            });
        }
        for a in 0..n {
            for b in a + 1..n {
                let (ab, ba) = (rtt_ms[a * n + b], rtt_ms[b * n + a]);
                if (ab - ba).abs() > SYMMETRY_TOLERANCE_MS {
                    return Err(MatrixError::Asymmetric {
                        a: names[a].clone(),
                        b: names[b].clone(),
                        ab,
                        ba,
                    });
                }
            }
        }
        Ok(RttMatrix { names, rtt_ms })
    }

    /// A synthetic matrix of `n` regions: random points on a sphere, RTT from great-circle
    /// distance at 2/3 c plus a 2–10 ms access cost, times a per-pair detour factor in
    /// 1.0–1.8 (skewed low) so that, like the real Internet, many pairs have a faster
    /// relayed path.
    pub fn synthesize(n: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let points: Vec<(f64, f64)> = (0..n)
            .map(|_| {
                let lat = (rng.random_range(-1.0f64..1.0)).asin() * 0.8;
                let lon = rng.random_range(-std::f64::consts::PI..std::f64::consts::PI);
                (lat, lon)
            })
            .collect();
        let access: Vec<f64> = (0..n).map(|_| rng.random_range(1.0..5.0)).collect();
        let mut rtt_ms = vec![0.0; n * n];
        for a in 0..n {
            for b in a + 1..n {
                let (la, oa) = points[a];
                let (lb, ob) = points[b];
                let cos = la.sin() * lb.sin() + la.cos() * lb.cos() * (oa - ob).cos();
                let km = cos.clamp(-1.0, 1.0).acos() * 6371.0;
                // 200 km per ms one way in fibre; RTT doubles it.
                let base = km / 100.0 + access[a] + access[b];
                let detour = 1.0 + 0.8 * rng.random_range(0.0f64..1.0).powi(2);
                let value = (base * detour * 100.0).round() / 100.0;
                rtt_ms[a * n + b] = value;
                rtt_ms[b * n + a] = value;
            }
        }
        RttMatrix {
            names: (0..n).map(|i| format!("r{i:03}")).collect(),
            rtt_ms,
        }
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True if there are no regions (never, for a parsed matrix).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Region names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Index of a region by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// RTT between two regions, ms.
    pub fn rtt_ms(&self, a: usize, b: usize) -> f64 {
        self.rtt_ms[a * self.names.len() + b]
    }

    /// RTT of a path of region indices, ms.
    pub fn path_rtt_ms(&self, path: &[usize]) -> f64 {
        path.windows(2).map(|w| self.rtt_ms(w[0], w[1])).sum()
    }

    /// The true lowest-RTT path from `src` to `dst` with at most two relays, and its RTT.
    /// O(N²): for each first relay, the best second hop towards `dst` is precomputed.
    pub fn optimal_path(&self, src: usize, dst: usize) -> (Vec<usize>, f64) {
        let n = self.len();
        let mut best = (vec![src, dst], self.rtt_ms(src, dst));
        for r1 in (0..n).filter(|&r| r != src && r != dst) {
            let one = self.rtt_ms(src, r1) + self.rtt_ms(r1, dst);
            if one < best.1 {
                best = (vec![src, r1, dst], one);
            }
            for r2 in (0..n).filter(|&r| r != src && r != dst && r != r1) {
                let two = self.rtt_ms(src, r1) + self.rtt_ms(r1, r2) + self.rtt_ms(r2, dst);
                if two < best.1 {
                    best = (vec![src, r1, r2, dst], two);
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "region,A,B,C\nA,0,10,50\nB,10,0,20\nC,50,20,0\n";

    #[test]
    fn builtin_matrix_is_the_measured_30_cities() {
        let m = RttMatrix::parse(BUILTIN_CSV).expect("the built-in matrix parses");
        assert_eq!(m.len(), 30);
        let (fra, syd) = (m.index_of("Frankfurt"), m.index_of("Sydney"));
        let (Some(fra), Some(syd)) = (fra, syd) else {
            panic!("Frankfurt and Sydney are in the built-in matrix");
        };
        assert!((m.rtt_ms(fra, syd) - 274.02).abs() < 0.01);
        assert_eq!(RttMatrix::builtin(), m);
    }

    #[test]
    fn parses_and_finds_relays() {
        let m = RttMatrix::parse(GOOD).expect("valid");
        assert_eq!(m.len(), 3);
        assert_eq!(m.rtt_ms(0, 2), 50.0);
        assert_eq!(m.optimal_path(0, 2), (vec![0, 1, 2], 30.0));
        let crlf = GOOD.replace('\n', "\r\n");
        assert_eq!(RttMatrix::parse(&crlf).expect("crlf"), m);
    }

    #[test]
    fn malformed_matrices_have_clear_errors() {
        let cases = [
            ("", "empty"),
            ("region,A\nA,0\n", "at least 2"),
            ("region,A,A\nA,0,1\nA,1,0\n", "appears twice"),
            ("region,A,B\nA,0,1\n", "expected 2 data rows"),
            (
                "region,A,B\nA,0,1\nB,1\n",
                "line 3: expected 3 cells, found 2",
            ),
            ("region,A,B\nA,0,1\nX,1,0\n", "named `X`"),
            ("region,A,B\nA,0,fast\nB,1,0\n", "`fast` is not a number"),
            ("region,A,B\nA,0,-1\nB,-1,0\n", "not a valid RTT"),
            ("region,A,B\nA,1,1\nB,1,0\n", "to itself must be 0"),
            (
                "region,A,B\nA,0,1\nB,2,0\n",
                "not symmetric: A→B is 1 ms but B→A is 2 ms",
            ),
            (
                "region,A,B\nA,0,1\nB,1,0\nC,1,1\n",
                "expected 2 data rows (one per region in the header), found 3",
            ),
        ];
        for (text, expected) in cases {
            let err = RttMatrix::parse(text).expect_err(expected).to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn synthetic_matrix_is_valid_and_has_relay_gains() {
        let m = RttMatrix::synthesize(40, 7);
        let mut csv = format!("region,{}\n", m.names().join(","));
        for a in 0..m.len() {
            let row: Vec<String> = (0..m.len())
                .map(|b| format!("{:.2}", m.rtt_ms(a, b)))
                .collect();
            csv.push_str(&format!("{},{}\n", m.names()[a], row.join(",")));
        }
        let parsed = RttMatrix::parse(&csv).expect("synthetic matrix round-trips");
        assert_eq!(parsed.len(), 40);
        let gains = (1..40)
            .filter(|&b| m.optimal_path(0, b).0.len() > 2)
            .count();
        assert!(gains > 5, "only {gains} relayed optima");
    }
}

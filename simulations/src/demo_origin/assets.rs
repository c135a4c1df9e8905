//! Static files compiled into the binary: the chat page and its assets.
//! Nothing is fetched from elsewhere, so the page works offline and its load
//! time measures only the path through Skylane.

/// One embedded file.
pub struct Asset {
    /// Value of `Content-Type`.
    pub content_type: &'static str,
    /// The file itself.
    pub body: &'static str,
}

/// The chat page served at `/`.
pub const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_str!("assets/index.html"),
};

const STATIC: &[(&str, Asset)] = &[
    (
        "app.js",
        Asset {
            content_type: "text/javascript; charset=utf-8",
            body: include_str!("assets/app.js"),
        },
    ),
    (
        "style.css",
        Asset {
            content_type: "text/css; charset=utf-8",
            body: include_str!("assets/style.css"),
        },
    ),
    (
        "logo.svg",
        Asset {
            content_type: "image/svg+xml",
            body: include_str!("assets/logo.svg"),
        },
    ),
];

/// The asset served at `/static/{name}`, if any.
pub fn find(name: &str) -> Option<&'static Asset> {
    STATIC
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, asset)| asset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_references_only_embedded_assets() {
        for reference in INDEX.body.split("\"/static/").skip(1) {
            let name = reference.split('"').next().unwrap_or_default();
            assert!(find(name).is_some(), "index.html references missing {name}");
        }
        assert!(find("../mod.rs").is_none());
        assert!(!INDEX.body.contains("http://") && !INDEX.body.contains("https://"));
    }
}
